"""How much KIVI 2-bit distorts a compressed context's keys and values, per press and ratio.

A diagnostic, not a benchmark: it prefills the first N tokens of the
perplexity text on the bundled model, compresses a copy with each press at
each ratio, and quantizes what every (layer, kv-head) cell keeps the way
kvengine's KIVI pool does (32-token blocks, keys per channel, values per
token in groups of 32). It prints the relative error (Frobenius norm of the
error over that of the cache) of keys and values, and the share of tokens left
in full precision (a partly filled last block).

    .venv/bin/python tools/kivi_group_error.py [N] [PRESS,PRESS,...]
"""

from __future__ import annotations

import sys

import torch

from kvengine.eval.perplexity import text_ids
from kvengine.cache.quant import dequantize, quantize
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.models import load
from kvengine.press import press_from_spec

BLOCK, GROUP, BITS = 32, 32, 2


def errors(engine: Engine, seq_id: int) -> tuple[float, float, float]:
    """(key relative error, value relative error, full-precision share) of one sequence's cache."""
    kv = engine.sequences[seq_id].kv
    assert kv is not None
    sums = torch.zeros(4, dtype=torch.float64)  # key error, key norm, value error, value norm (squared)
    residual = total = 0
    for layer in range(engine.model.num_layers):
        slots, lens = kv.context(layer)
        k, v = engine.pool.read(slots.reshape(-1))
        k, v = k.view(*slots.shape, -1), v.view(*slots.shape, -1)
        for head in range(k.shape[0]):
            n = k.shape[1] if lens is None else int(lens[head])
            full = n // BLOCK * BLOCK
            residual, total = residual + n - full, total + n
            kb = k[head, :full].reshape(-1, BLOCK, k.shape[-1])
            vb = v[head, :full].reshape(-1, BLOCK, v.shape[-1] // GROUP, GROUP)
            kq = dequantize(quantize(kb, BITS, dim=1), torch.float32)
            vq = dequantize(quantize(vb, BITS, dim=3), torch.float32)
            sums += torch.tensor(
                [(kq - kb).pow(2).sum(), kb.pow(2).sum(), (vq - vb).pow(2).sum(), vb.pow(2).sum()],
                dtype=torch.float64,
            )
    return float((sums[0] / sums[1]).sqrt()), float((sums[2] / sums[3]).sqrt()), residual / total


def main(num_tokens: int, specs: list[str]) -> None:
    model = load()
    ids = text_ids(model, "prose", num_tokens, 0)
    engine = Engine(model, CacheConfig(), SchedulerConfig(max_num_seqs=4, max_step_tokens=num_tokens))
    base = engine.add_context(ids, keep_queries=True)
    engine.run()
    print("press ratio key_rel_err value_rel_err fp_share")
    print("none 0.00 {:.4f} {:.4f} {:.3f}".format(*errors(engine, base)))
    for spec in specs:
        for ratio in (0.25, 0.5, 0.75):
            copy = engine.compress_context(base, press_from_spec(spec, ratio))
            print(f"{spec} {ratio:.2f} " + "{:.4f} {:.4f} {:.3f}".format(*errors(engine, copy)), flush=True)
            engine.release(copy)


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 1024,
        sys.argv[2].split(",") if len(sys.argv) > 2 else ["knorm", "streaming_llm", "snapkv"],
    )
