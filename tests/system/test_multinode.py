"""Two nodes as one job: the shipped multi-node launch config, emulated by two "machines" on
127.0.0.1, each one `accelerate launch` with one CPU rank, DeepSpeed ZeRO-3 over gloo.

What a cluster needs from the launch: one job over both nodes (not one job per node), the
same weights as the same ranks on one node, and an exact resume.
"""

import json
import subprocess

import pytest
from launch import ROOT, WORKER, _common, _zero3_env, launch, run_worker
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = ["train.save_every=2", "train.keep_last=3", "train.weight_decay=0.0"]


def two_machines(tmp, tiny_dir, synth_dir, out, *overrides, outs=None, timeout=900, env=None):
    """Both nodes' launchers started together; returns each node's (rc, output) and records.
    ``outs``: a train.output_dir per node (default: ``out`` on both, one shared folder)."""
    head = launch("configs/accelerate/zero3_multinode.yaml")  # a free --main_process_port
    procs = []
    for node in (0, 1):
        record = tmp / f"record-{out.name}.json"
        cmd = [*head, "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(node),
               "--main_process_ip", "127.0.0.1", "--deepspeed_config_file", "configs/deepspeed/zero3_cpu.json",
               str(WORKER), str(record), "--rewards", "random",
               *_common(tiny_dir, synth_dir, outs[node] if outs else out, *overrides)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**_zero3_env(tmp), **(env or {})}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        try:
            output, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, output))
    return results


def _final_weights(run):
    return load_file(str(run / "checkpoint-4" / "model" / "model.safetensors"))


def test_two_nodes_train_as_one_job_equal_to_one_node_and_resume_exactly(tmp_path, tiny_dir, synth_dir):
    one = tmp_path / "one-node"
    run_worker(tmp_path, tiny_dir, synth_dir, one, "train.max_steps=4", *STEPS,
               launcher="configs/accelerate/cpu_zero3_2proc.yaml", flags=["--rewards", "random"],
               env=_zero3_env(tmp_path))
    two = tmp_path / "two-nodes"
    outputs = []
    for steps in (2, 4):  # two steps, stop, then a resume of the same launch to four
        for rc, output in two_machines(tmp_path, tiny_dir, synth_dir, two, f"train.max_steps={steps}", *STEPS):
            assert rc == 0, output[-5000:]
            outputs.append(output)
    assert "over 2 rank(s)" in outputs[0], "node 0 must train over both nodes' ranks"
    assert "checkpoint-2 at step 2" in outputs[2], "the second launch resumes the first's checkpoint"
    records = [json.loads((tmp_path / f"record-two-nodes.json.rank{r}").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in records] == [4, 4]
    assert records[0]["after"] == records[1]["after"], "the two nodes' weights differ: each trained alone"
    a, b = _final_weights(one), _final_weights(two)
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "two nodes must train exactly as the same two ranks on one node"
    assert not (ROOT / ".deepspeed_env").exists(), "the pdsh launcher's environment file was written"


def test_a_run_folder_per_node_is_refused_at_start_naming_the_fix(tmp_path, tiny_dir, synth_dir):
    """Each node with its own disk at train.output_dir (emulated: a folder per node): refused before
    any model loads, on both nodes, with one line that says what to do."""
    outs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    results = two_machines(tmp_path, tiny_dir, synth_dir, outs[0], "train.max_steps=1", outs=outs, timeout=600,
                           env={"MGPO_SHARED_FOLDER_WAIT_S": "0"})  # (no network filesystem to wait for here)
    for rc, output in results:
        assert rc != 0
        assert "is not one folder shared by every node" in output, output[-3000:]
        assert "a filesystem every node mounts at the same path" in output
    assert not any((o / "config.yaml").exists() for o in outs), "nothing is started in either folder"
