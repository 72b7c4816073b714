"""Cost accounting in forward-pass equivalents, the unit every fit, baseline and analysis reports.

Example:
    >>> meter = CostMeter()
    >>> meter.prompt_token_layers, meter.prompts = 10.0 * 4, 1  # one 10-token prompt, 4 layers
    >>> meter.add(tokens=1, layers=2, backward=True)  # one token through 2 blocks, forward and backward
    >>> meter.forward_equivalents()
    0.15
"""

from __future__ import annotations

from lens_laai.tasks.prompts import Batch


class CostMeter:
    """Counts compute in token-layers (backward = 2× forward) to report forward-pass equivalents.

    One forward-pass equivalent is one full forward of one prompt: ``prompt tokens × n_layers``
    token-layers. Attention's length-dependent cost is ignored, which flatters long prompts
    slightly on the full path and never the fast path.

    Two 7-token prompts on the 3-layer tiny model set the unit; then each row's last token goes
    through one block, forward and backward.

    Example:
        >>> from lens_laai.fastpath.cost import CostMeter
        >>> from lens_laai.tasks.prompts import make_batch
        >>> from lens_laai.testing import tiny_tokenizer
        >>> batch = make_batch(tiny_tokenizer(), ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"])
        >>> meter = CostMeter()
        >>> meter.register_prompts(batch, n_layers=3)
        >>> meter.prompts, meter.prompt_token_layers
        (2, 42.0)
        >>> meter.add(tokens=len(batch), layers=1, backward=True)
        >>> round(meter.forward_equivalents(), 4)  # 2 × 1 × 3 token-layers over 21 per prompt
        0.2857
        >>> other = CostMeter()
        >>> other.add(tokens=7, layers=3, backward=False)  # one full forward, charged here
        >>> meter.merge(other)
        >>> round(meter.forward_equivalents(), 4), other.token_layers
        (1.2857, 0.0)
    """

    def __init__(self) -> None:
        self.token_layers = 0.0
        self.prompt_token_layers = 0.0
        self.prompts = 0
        self.unit_fixed = False

    def fix_unit(self) -> None:
        """Keep the unit the prompts registered so far define (e.g. zero-shot ones), whatever is registered later.

        A fit on k-shot prompts still reports cost in zero-shot forwards, comparable with other fits.
        """
        self.unit_fixed = True

    def add(self, tokens: float, layers: int, backward: bool) -> None:
        self.token_layers += tokens * layers * (3 if backward else 1)

    def register_prompts(self, batch: Batch, n_layers: int) -> None:
        if self.unit_fixed:
            return
        self.prompt_token_layers += float(batch.attention_mask.sum()) * n_layers
        self.prompts += len(batch)

    def merge(self, other: CostMeter) -> None:
        """Charge ``other``'s compute to this meter (in this meter's unit) and zero ``other``'s count."""
        self.token_layers += other.token_layers
        other.token_layers = 0.0

    def forward_equivalents(self) -> float:
        per_prompt = self.prompt_token_layers / max(self.prompts, 1)
        return self.token_layers / per_prompt if per_prompt else 0.0
