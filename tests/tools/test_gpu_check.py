"""mgpo.tools.gpu_check: what the GPU check runs."""


def test_gpu_check_steps_are_train_py_with_the_launch_of_each_mode():
    """What the GPU check runs: one train.py step per mode; ZeRO-3 through accelerate on one process."""
    from mgpo.tools.gpu_check import step_command

    plain, zero3 = step_command("plain", ["model.path=m"]), step_command("zero3", ["model.path=m"])
    assert plain[1].endswith("train.py") and "train.max_steps=1" in plain and plain[-1] == "model.path=m"
    assert zero3[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert zero3[4].endswith("zero3_8gpu.yaml") and zero3[5:7] == ["--num_processes", "1"]
    assert "train.lora_rank=16" in step_command("lora", [])
