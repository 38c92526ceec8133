"""Engine check on a GPU: eager vs CUDA-graph decode on a random-init ~1B Llama (bf16).

Produced the H200 figures in docs/INFERENCE.md. Run from the repo root: PYTHONPATH=. python3 bench/gpu/engine_check.py
"""
import asyncio
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sdk.inference.engine import Engine
from sdk.inference.types import EngineConfig, GenerationRequest

print("torch", torch.__version__, "transformers", __import__("transformers").__version__, torch.cuda.get_device_name())
tok = AutoTokenizer.from_pretrained(os.path.join(os.getcwd(), "bench", "assets", "smollm2-tokenizer"))
cfg = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
nparams = sum(p.numel() for p in model.parameters())
wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); bw = 2 * 10 * (1 << 30) / (time.perf_counter() - t)
del x, y
bound = bw / wbytes
print(f"params {nparams/1e9:.3f}B, weights {wbytes/1e9:.2f} GB, copy bw {bw/1e12:.2f} TB/s, batch-1 bound {bound:.0f} tok/s")
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(100, 49000, (128,), generator=g).tolist() for _ in range(64)]
N = 128

def hf_generate(batch):
    ids = torch.tensor(prompts[:batch], device="cuda")
    model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.cuda.synchronize(); t = time.perf_counter()
    model.generate(input_ids=ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)
    torch.cuda.synchronize(); return batch * N / (time.perf_counter() - t)

import sdk.inference.cuda_graphs as cgmod

_real_compile = cgmod.compile_pointwise_modules
async def run(graphs, compile_=False):
    cgmod.compile_pointwise_modules = _real_compile if compile_ else (lambda m: 0)
    eng = Engine.from_model(model, tok, EngineConfig(max_sequence_length=512, max_batch_size=64, cuda_graphs=graphs,
                                                     prefix_cache_tokens=0, warmup=False))
    res = {}
    if graphs:
        t = time.perf_counter(); await eng.warmup(); print("warmup %.1fs graphs %d" % (time.perf_counter() - t, len(eng._scheduler.decoder.graphs)))
    req = lambda p, n=N: GenerationRequest(prompt_token_ids=p, max_new_tokens=n, temperature=0.0)
    for c in (1, 8, 32, 64):  # warm (captures graphs for these batch buckets)
        await asyncio.gather(*(eng.generate(req(prompts[i], 130 if c == 1 else 8)) for i in range(c)))
    t = time.perf_counter(); r = await eng.generate(req(prompts[0])); dt = time.perf_counter() - t
    res["b1_wall"] = N / dt; res["b1_decode"] = r.usage.tokens_per_s; res["ids0"] = r.token_ids
    for c in (8, 32, 64):
        t = time.perf_counter()
        rs = await asyncio.gather(*(eng.generate(req(prompts[i])) for i in range(c)))
        res[f"c{c}"] = sum(len(x.token_ids) for x in rs) / (time.perf_counter() - t)
        if c == 8: res["ids8"] = [x.token_ids for x in rs]
    res["graphs_active"] = bool(eng._scheduler.decoder is not None and not eng._scheduler.decoder.disabled)
    if graphs and res["graphs_active"]:
        import sdk.inference.scheduler as sch
        dec = eng._scheduler.decoder
        g, _ = dec.graphs[(1, 256)]
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(200): g.replay()
        torch.cuda.synchronize(); res["replay_ms"] = (time.perf_counter() - t) / 200 * 1e3
        acc = {"dec": 0.0, "sample": 0.0, "step": 0.0, "n": 0}
        orig_sample, orig_decode = sch.sample_rows, eng._scheduler._decode
        def tsample(*a):
            t0 = time.perf_counter(); r = orig_sample(*a); acc["sample"] += time.perf_counter() - t0; return r
        def tdec(batch):
            t0 = time.perf_counter(); r = dec(batch); acc["dec"] += time.perf_counter() - t0; return r
        def tstep():
            t0 = time.perf_counter(); orig_decode(); acc["step"] += time.perf_counter() - t0; acc["n"] += 1
        sch.sample_rows = tsample; eng._scheduler.decoder = tdec; eng._scheduler._decode = tstep
        t = time.perf_counter(); await eng.generate(req(prompts[1])); wall = time.perf_counter() - t
        sch.sample_rows = orig_sample; eng._scheduler.decoder = dec
        n = acc["n"]
        res["breakdown"] = {k: round(acc[k] / n * 1e3, 3) for k in ("dec", "sample", "step")} | {"iter_ms": round(wall / n * 1e3, 3)}
    eng.close()
    return res

print(f"hf generate b1 {hf_generate(1):.0f} tok/s, b32 {hf_generate(32):.0f} tok/s")
out = {}
for graphs, comp in ((False, False), (True, True)):
    t = time.perf_counter()
    r = asyncio.run(run(graphs, comp))
    out[graphs] = r
    if "replay_ms" in r: print("graph replay only (b1, kv 256): %.3f ms/step; engine step breakdown ms:" % r["replay_ms"], r.get("breakdown"))
    print(f"cuda_graphs={graphs} compile={comp} active={r['graphs_active']} b1 wall {r['b1_wall']:.0f} decode {r['b1_decode']:.0f} tok/s "
          f"({100*r['b1_decode']/bound:.1f}% of bound); c8 {r['c8']:.0f} c32 {r['c32']:.0f} c64 {r['c64']:.0f} tok/s  [{time.perf_counter()-t:.0f}s]")
same0 = out[False]["ids0"] == out[True]["ids0"]
same8 = sum(a == b for a, b in zip(out[False]["ids8"], out[True]["ids8"]))
print("graph vs eager greedy ids equal: b1", same0, "c8", same8, "/ 8")
