"""Generation: the decoding engine (`engine`: prefill, a jitted decode loop, streaming), logits
processors and samplers (`samplers`), beam search (`beam`), speculative decoding
(`speculative`) and self-consistency voting (`self_consistency`)."""

from seqjax.generate.beam import BeamSearchResult, beam_search
from seqjax.generate.engine import Generation, generate, stream
from seqjax.generate.samplers import Sampler, greedy, make_sampler
from seqjax.generate.self_consistency import Vote, self_consistency
from seqjax.generate.speculative import SpeculativeResult, speculative_generate

__all__ = [
    "BeamSearchResult",
    "Generation",
    "Sampler",
    "SpeculativeResult",
    "Vote",
    "beam_search",
    "generate",
    "greedy",
    "make_sampler",
    "self_consistency",
    "speculative_generate",
    "stream",
]
