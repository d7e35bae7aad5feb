"""lola_train.train.loop.prepare_for_sharding: what FSDP and DeepSpeed launches need before accelerate.prepare.

Both failures were seen on an H200 (scripts/gpu_check.py part 'dist', BENCHMARKS.md "GPU check"); accelerate
refuses FSDP and DeepSpeed without an accelerator, so the settings are checked here on stand-in states.
"""
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from torch import nn

from lola_train.modeling.attention_config import ConfigError
from lola_train.train.loop import prepare_for_sharding


def accelerator(kind, **plugin):
    state = SimpleNamespace(distributed_type=kind, deepspeed_plugin=None, fsdp_plugin=None)
    if kind == DistributedType.DEEPSPEED:
        state.deepspeed_plugin = SimpleNamespace(deepspeed_config=dict(plugin))
    if kind == DistributedType.FSDP:
        state.fsdp_plugin = SimpleNamespace(**plugin)
    return SimpleNamespace(state=state)


def mixed_model():
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4))  # frozen bf16 + trained fp32
    model[0].requires_grad_(False)
    return model


def test_deepspeed_gets_the_micro_batch_of_the_stage():
    acc = accelerator(DistributedType.DEEPSPEED, gradient_accumulation_steps=1)
    prepare_for_sharding(acc, mixed_model(), SimpleNamespace(batch_size=3), "transfer")
    assert acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    acc = accelerator(DistributedType.DEEPSPEED, train_micro_batch_size_per_gpu=5)  # set by the user: kept
    prepare_for_sharding(acc, mixed_model(), SimpleNamespace(batch_size=3), "transfer")
    assert acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 5


def test_fsdp1_with_two_dtypes_names_the_fix():
    acc = accelerator(DistributedType.FSDP, fsdp_version=1)
    with pytest.raises(ConfigError, match=r"finetune: FSDP .*bfloat16, float32.*model\.dtype=float32.*fsdp_version: 2"):
        prepare_for_sharding(acc, mixed_model(), SimpleNamespace(batch_size=1), "finetune")


def test_fsdp_accepts_one_dtype_and_fsdp2_any():
    prepare_for_sharding(accelerator(DistributedType.FSDP, fsdp_version=1), mixed_model().float(),
                         SimpleNamespace(batch_size=1), "transfer")
    prepare_for_sharding(accelerator(DistributedType.FSDP, fsdp_version=2), mixed_model(),
                         SimpleNamespace(batch_size=1), "transfer")
    prepare_for_sharding(accelerator(DistributedType.NO), mixed_model(), SimpleNamespace(batch_size=1), "transfer")
