import json

import torch

from llama2.machine import describe_machine, machine_line, native_bf16_matmul
from llama2.training.loop import resolve_precision


def test_describe_machine_is_json_and_names_the_cpu_speed_facts():
    info = describe_machine()
    assert json.loads(json.dumps(info)) == info  # stage.json stores it as is
    assert info["cpu"] and info["cores"] >= 1 and info["threads"] >= 1
    assert info["torch"] == torch.__version__
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["native_bf16"] is native_bf16_matmul()


def test_auto_precision_follows_native_bf16_on_cpu():
    expected = torch.bfloat16 if native_bf16_matmul() else None
    assert resolve_precision("auto", torch.device("cpu")) is expected


def test_machine_line_says_what_decides_the_speed():
    info = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "native_bf16": False, "cores": 2, "threads": 2,
            "torch": "2.13.0"}
    assert machine_line(info) == "AMD EPYC (AVX2, no native bf16), 2 cores, 2 threads, torch 2.13.0"
    with_gpu = machine_line(info | {"native_bf16": True, "gpus": ["NVIDIA H100"]})
    assert "(AVX2, native bf16)" in with_gpu and with_gpu.endswith(", GPU NVIDIA H100")
