"""slimlm.allocator: a training loop reuses its large blocks instead of having them faulted in anew."""

import resource
import sys

import pytest
import torch

from slimlm.allocator import reusing

BLOCK = 16 * 2**20  # floats: 64 MB blocks, above glibc's largest mmap threshold (32 MB), as logits are


def faults_per_step(steps: int) -> list[int]:
    """Minor page faults of each of ``steps`` steps that take three large blocks and free them, as a
    training step takes and frees its logits, their softmax and their gradient."""
    faults = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        logits = torch.ones(BLOCK)
        softmax = logits * 2
        grad = softmax.exp()
        del logits, softmax, grad
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings exist on Linux only")
def test_reusing_keeps_a_steps_freed_blocks_for_the_next_steps():
    outside = faults_per_step(4)  # mapped anew at every step: every 4 kB page faults in again
    with reusing():
        inside = faults_per_step(8)
    after = faults_per_step(1)  # glibc's defaults are back
    assert min(outside) > 40_000
    assert sum(inside[4:]) < sum(outside) / 2  # once the heap holds them, the blocks are taken again
    assert after[0] > 40_000
