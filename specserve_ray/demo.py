"""`make demo`: speculative generation on the embedded pair, with tokens/s and acceptance."""
from __future__ import annotations

import time

import torch

from specserve_ray.config import EngineConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.engine import SpecEngine
from specserve_ray.prompts import held_out_prompts


def main() -> None:
    torch.set_num_threads(2)
    engine = SpecEngine.from_config(EngineConfig())
    prompts = held_out_prompts(engine.tokenizer, 4, 48)
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    for label, k in (("target only", 0), ("speculative k=4", 4)):
        engine.speculation = SpeculationConfig(num_speculative_tokens=k)
        engine.totals = type(engine.totals)()
        start = time.perf_counter()
        outs = engine.generate(prompts, params, num_speculative_tokens=[k] * len(prompts))
        seconds = time.perf_counter() - start
        tokens = sum(len(o.output_ids) for o in outs)
        t = engine.totals
        print(f"== {label}: {tokens / seconds:.1f} tok/s over {len(prompts)} concurrent "
              f"requests; acceptance {t.acceptance_rate:.2f}, "
              f"{t.mean_acceptance_length:.2f} tokens per target call")
    print("-- prompt --")
    print(engine.tokenizer.decode(prompts[0]))
    print("-- continuation --")
    print(outs[0].text)


if __name__ == "__main__":
    main()
