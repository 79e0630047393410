"""DeepSpeed's `deepspeed.utils.zero_to_fp32` functions, over dsrun's converter (dsrun-to-fp32): they read
dsrun and DeepSpeed checkpoints. The standalone script each dsrun checkpoint directory carries is
runtime/checkpoint/standalone_to_fp32.py."""
from dsrun.runtime.checkpoint.to_fp32 import (convert_zero_checkpoint_to_fp32_state_dict,
                                              get_fp32_state_dict_from_zero_checkpoint,
                                              load_state_dict_from_zero_checkpoint)

__all__ = ["get_fp32_state_dict_from_zero_checkpoint", "convert_zero_checkpoint_to_fp32_state_dict",
           "load_state_dict_from_zero_checkpoint"]
