def all_gather(tensor, group):
    raise NotImplementedError("ring attention (flash_attn.utils.distributed.all_gather) needs several GPUs")
