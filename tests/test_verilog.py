"""CVDP-format RTL grading: references pass, wrong designs fail, stages shape the reward."""

import shutil

import numpy as np
import pytest

from jaxrl.eval.sandbox import Limits, Sandbox
from jaxrl.eval.verilog import (
    OWN_PROBLEMS,
    RewardWeights,
    VerilogGrader,
    apply_hunks,
    extract_verilog,
    grade_rtl_batch,
    load_cvdp,
)

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None or shutil.which("iverilog") is None,
    reason="needs bubblewrap and iverilog (apt-get install -y bubblewrap iverilog)",
)


@pytest.fixture(scope="module")
def grader():
    grader = VerilogGrader(Sandbox("bwrap"))
    yield grader
    grader.close()


@pytest.fixture(scope="module")
def problems(shared_data):
    return {p.id: p for p in load_cvdp([shared_data / "cvdp", OWN_PROBLEMS])}


def test_loader_reads_both_cvdp_layouts(problems):
    assert {"cvdp_copilot_lfsr_0001", "cvdp_agentic_fixed_arbiter_0001"} <= set(problems)
    assert {"jaxrl_rtl_counter_0001", "jaxrl_rtl_fifo_0001", "jaxrl_rtl_fsm_0001"} <= set(problems)
    lfsr = problems["cvdp_copilot_lfsr_0001"]
    assert lfsr.target == "rtl/lfsr_8bit.sv" and lfsr.env["TOPLEVEL"] == "lfsr_8bit"
    arbiter = problems["cvdp_agentic_fixed_arbiter_0001"]
    assert arbiter.reference.startswith("`timescale") and "endmodule" in arbiter.reference
    assert "docs/specification.md" in arbiter.full_prompt()
    # Xcelium/coverage tasks load but say why they cannot be graded here.
    assert not problems["cvdp_agentic_8x3_priority_encoder_0003"].gradable
    assert "xcelium" in problems["cvdp_agentic_8x3_priority_encoder_0003"].ungradable_reason


def test_every_gradable_reference_passes(grader, problems):
    gradable = [p for p in problems.values() if p.gradable and p.reference is not None]
    assert len(gradable) == 5
    results = grader.grade_many(gradable, [p.reference for p in gradable], raw_code=True)
    for result in results:
        assert result.passed and result.reward == pytest.approx(1.0), result


def test_wrong_design_fails_tests_with_partial_reward(grader, problems):
    fsm = problems["jaxrl_rtl_fsm_0001"]
    wrong = fsm.reference.replace("S1011 : S10", "S1 : S10")  # forgets the overlap after a match
    result = grader.grade(fsm, f"```verilog\n{wrong}```")
    assert result.syntax_ok and result.tests == 3 and 0 < result.failed < 3
    w = RewardWeights()
    assert result.reward == pytest.approx(w.format + w.syntax + w.tests * result.tests_fraction)
    counter = problems["jaxrl_rtl_counter_0001"]
    stuck = counter.reference.replace("count + 4'd1", "count")
    assert grader.grade(counter, stuck, raw_code=True).failed == 2  # reset-only test still passes


def test_syntax_error_scores_at_syntax_stage(grader, problems):
    fifo = problems["jaxrl_rtl_fifo_0001"]
    result = grader.grade(fifo, "```systemverilog\n" + fifo.reference.replace("endmodule", "") + "```")
    assert result.format_ok and not result.syntax_ok
    assert result.reward == pytest.approx(RewardWeights().format)
    assert result.reason.startswith("syntax:") and "/dev/shm" not in result.reason


def test_no_code_block_scores_zero(grader, problems):
    result = grader.grade(problems["jaxrl_rtl_counter_0001"], "I would use a counter.")
    assert not result.format_ok and result.reward == 0.0


def test_hanging_simulation_is_killed_and_keeps_the_syntax_credit(problems):
    counter = problems["jaxrl_rtl_counter_0001"]
    # A zero-delay combinational loop: vvp spins forever at one timestep.
    hang = counter.reference.replace("endmodule", "logic a = 0;\nalways @(a) a <= ~a;\ninitial #1 a = 1;\nendmodule")
    grader = VerilogGrader(Sandbox("bwrap"), limits=Limits(wall_seconds=8.0, cpu_seconds=8, memory_bytes=4 << 30))
    result = grader.grade(counter, hang, raw_code=True)
    grader.close()
    assert result.syntax_ok and result.tests == 0
    assert "did not finish" in result.reason
    assert result.reward == pytest.approx(RewardWeights().format + RewardWeights().syntax)


def test_cache_and_batch_rewards(grader, problems):
    counter = problems["jaxrl_rtl_counter_0001"]
    first = grader.grade(counter, counter.reference, raw_code=True)
    again = grader.grade(counter, counter.reference, raw_code=True)
    assert again.cached and again.reward == first.reward
    answers = [f"```verilog\n{counter.reference}```", "no code"]
    rewards = grade_rtl_batch(answers, [counter, counter], grader)
    assert rewards.dtype == np.float32
    np.testing.assert_allclose(rewards, [1.0, 0.0])


def test_extract_and_patch_helpers():
    assert extract_verilog("x\n```verilog\nmodule m; endmodule\n```\n") == "module m; endmodule\n"
    assert extract_verilog("module m; endmodule") == "module m; endmodule"
    assert extract_verilog("no code here") is None
    original = "a\nb\nc\n"
    assert apply_hunks(original, "@@ -1,3 +1,3 @@\n a\n-b\n+B\n c") == "a\nB\nc\n"
    assert apply_hunks("", "@@ -0,0 +1,2 @@\n+x\n+y") == "x\ny\n"


def test_pytest_harness_mode_runs_the_problems_own_test_runner(problems):
    lfsr = problems["cvdp_copilot_lfsr_0001"]
    grader = VerilogGrader(Sandbox("bwrap"), harness="pytest")
    good, bad = grader.grade_many(
        [lfsr, lfsr], [lfsr.reference, lfsr.reference.replace("lfsr_out <= {", "lfsr_out <= ~{")], raw_code=True
    )
    grader.close()
    assert good.passed and good.reward == pytest.approx(1.0), good
    assert bad.syntax_ok and not bad.passed and "pytest cases" in bad.reason
