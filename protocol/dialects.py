"""Every wire dialect the server speaks, one declarative spec each (see ``protocol/spec.py``). To add
a dialect: write its spec module and list an instance here; the server registers its paths."""

from protocol.generic_v1 import GenericV1
from protocol.openai import Chat, Completions
from protocol.request_id import Batch, RequestIdApi
from protocol.responses import Responses
from protocol.takeoff import Takeoff
from protocol.together import Together
from protocol.truss import Truss

DIALECTS = (RequestIdApi(), Batch(), Completions(), Chat(), Responses(), Takeoff(), Together(), Truss(), GenericV1())
