"""Stand-in for vllm: only the names OpenRLHF 0.11.2 imports at module level (no generation runs)."""
__version__ = "0.29.0"


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
