// The generic v1 seed's JavaScript stream reader (generic-v1-stream-api.txt: "Example Request" +
// "Handling Stream Events" + "Error Handling"), run with node's built-in fetch. Adapted only in the
// URL, the key and the body (read from the environment), and processChunk records what it sees.
// Prints one JSON line: {status, deltas, texts, finishReasons, errors, sawDone}.
const URL_BASE = process.env.KVBENTO_URL;
const API_KEY = process.env.KVBENTO_KEY;
const BODY = JSON.parse(process.env.KVBENTO_BODY);

const seen = { deltas: [], texts: [], finishReasons: [], errors: [], sawDone: false, ids: [] };

function processChunk(chunk) {
  // Update UI with chunk.delta
  seen.deltas.push(chunk.delta);
  seen.texts.push(chunk.text);
  seen.ids.push(chunk.id);
  if (chunk.finishReason !== undefined) seen.finishReasons.push(chunk.finishReason);
}

async function handleStream(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split('\n');
    buffer = lines.pop() || '';
    for (const line of lines) {
      if (line.startsWith('data: ')) {
        const data = line.slice(6);
        if (data === '[DONE]') {
          seen.sawDone = true;
          return;
        }
        const parsed = JSON.parse(data);
        if (parsed.error) {
          console.error('Stream error:', parsed.error);
          seen.errors.push(parsed.error);
          continue;
        }
        processChunk(parsed);
      }
    }
  }
}

const response = await fetch(`${URL_BASE}/v1/generate/stream`, {
  method: 'POST',
  headers: {
    'Authorization': `Bearer ${API_KEY}`,
    'Content-Type': 'application/json',
  },
  body: JSON.stringify(BODY),
});
seen.status = response.status;
if (response.ok) {
  await handleStream(response);
} else {
  seen.errors.push((await response.json()).error);
}
process.stdout.write(JSON.stringify(seen) + '\n');
