"""Stand-in for flash_attn: the padding helpers OpenRLHF's packing imports (flash_attn.bert_padding)."""
__version__ = "2.8.3"
