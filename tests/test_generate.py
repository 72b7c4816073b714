import torch

from lens_laai import HeadIntervention, generate


def test_cached_and_uncached_generation_agree(tiny):
    iv = HeadIntervention.zeros(tiny, layers=[1])
    torch.manual_seed(0)
    iv.deltas[1] = torch.randn_like(iv.deltas[1]) * 5
    for intervention in (None, iv):
        for where in ("prompt", "every_token"):
            cached = generate(tiny, "Q: hot\nA:", intervention, max_new_tokens=8, delta_at=where)
            uncached = generate(
                tiny, "Q: hot\nA:", intervention, max_new_tokens=8, delta_at=where, use_past_kv_cache=False
            )
            assert cached == uncached
    assert generate(tiny, "Q: hot\nA:", iv, max_new_tokens=8) != generate(tiny, "Q: hot\nA:", None, max_new_tokens=8)
