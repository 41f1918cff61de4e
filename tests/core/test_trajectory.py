"""mgpo.core.trajectory: what a trajectory hands to the reward."""

from mgpo.core.reward import score
from mgpo.core.trajectory import Trajectory


def test_final_text_is_the_templates_final_turn():
    """Bug 12: an empty turn 2 fell back to turn 1's text for the reward."""
    t = Trajectory("x", 0, "A", ("a", "b"), (10, 10), (10, 10), turns=2, turn1_text="\\boxed{A}", turn2_text="")
    assert t.final_text == "" and score([t]).tolist() == [0.0]
    one = Trajectory("x", 0, "A", ("a", "b"), (10, 10), (10, 10), turns=1, turn1_text="\\boxed{A}")
    assert score([one]).tolist() == [1.0]
