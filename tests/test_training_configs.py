"""The shipped accelerate configs load, and accelerate's own launcher turns them into the plugins meant."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def launcher_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/NAME.yaml -m easyref train` gives each process."""
    argv = ["--config_file", str(CONFIGS / f"{name}.yaml"), "-m", "easyref", "train"]
    args = launch_command_parser().parse_args(argv)
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {key: value for key, value in env.items() if key.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.mark.parametrize(("name", "kind"), [("multi_gpu", DistributedType.MULTI_GPU),
                                            ("deepspeed_zero2", DistributedType.DEEPSPEED),
                                            ("fsdp", DistributedType.FSDP)])
def test_configs_are_accelerate_configs(name, kind):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind and config.mixed_precision == "bf16"
    launch_options = {action.dest for action in launch_command_parser()._actions}
    for section in (config.deepspeed_config, config.fsdp_config):
        assert not set(section or {}) - launch_options  # every key is one `accelerate launch` knows


def test_deepspeed_config_is_zero2_bf16_and_leaves_accumulation_to_easyref():
    env = launcher_env("deepspeed_zero2")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env  # --gradient-accumulation-steps decides
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 2
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "none"


def test_fsdp_config_wraps_the_mllm_layers_and_unet_blocks():
    env = launcher_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert set(plugin.transformer_cls_names_to_wrap) == {"Qwen2VLDecoderLayer", "Qwen2VLVisionBlock",
                                                         "BasicTransformerBlock"}
    from diffusers.models.attention import BasicTransformerBlock
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    assert BasicTransformerBlock and modeling_qwen2_vl.Qwen2VLDecoderLayer and modeling_qwen2_vl.Qwen2VLVisionBlock
