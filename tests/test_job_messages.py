"""The job rewords library errors with its flags (library code names no flag)."""

import pytest

from oftjax.train.config import UsageError, parse_args, reword


def test_reword_names_the_flag_but_not_values_or_user_input():
  assert reword("mesh entry 'mesh' is not AXIS=N", {"mesh": "mesh"}) == (
    "--mesh entry 'mesh' is not AXIS=N"
  )
  assert reword(
    "example is 9 tokens, more than seq_len=4; raise seq_len to at least 9", {"seq_len": "seq_len"}
  ) == ("example is 9 tokens, more than seq_len=4; raise --seq-len to at least 9")
  assert (
    reword(
      "num_processes > 1 needs coordinator_address HOST:PORT (process 0's)",
      {"num_processes": "num_processes", "coordinator_address": "coordinator_address"},
    )
    == "--num-processes > 1 needs --coordinator-address HOST:PORT (process 0's)"
  )
  assert (
    reword("global_rows 6 is not divisible by the 4 processes", {"global_rows": "batch_size"})
    == "--batch-size 6 is not divisible by the 4 processes"
  )
  assert reword("no parameter here", {}) == "no parameter here"


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--neumann-terms", "1"], "--neumann-terms must be >= 2 (got 1)"),
    (["--lora-rank", "0"], "--lora-rank must be a positive integer (got 0)"),
    (["--method", "full", "--block-size", "1"], "--block-size must be >= 2 (got 1)"),
  ],
)
def test_adapter_flags_are_checked_by_adapter_config_and_named_by_the_job(argv, message):
  with pytest.raises(UsageError) as err:
    parse_args(argv)
  assert str(err.value) == message
