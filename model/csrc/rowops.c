/* RMSNorm and RoPE in bf16 for the lean step where the CPU has AVX512-BF16 but no AMX (with AMX
 * they come with amx.c). Built and loaded by model/native.py. */
#include "rowops.h"
