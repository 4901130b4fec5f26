"""h64lm.py, as torchrun runs it, except that on torchrun's first attempt every process dies right after the run's
first checkpoint: a job that loses its workers mid-run, for `torchrun --max-restarts` to relaunch
(test_resume.py, test_a_killed_two_process_run_relaunched_by_torchrun_continues_exactly). With DIE_MID_SAVE=1 they
die in the middle of the second save instead, its shards written and the file that names them not (test_shard.py)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h64lm  # noqa: E402


def main() -> int:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":  # the first attempt; a relaunch counts 1, 2, ...
        save_run, write_run_files = h64lm.save_run, h64lm.write_run_files
        saves = []

        def save_then_die(run, *args, **kwargs):
            save_run(run, *args, **kwargs)
            # Every process returns from save_run only once rank 0 has written latest.pt, so the checkpoint is
            # whole; os._exit skips all cleanup, as a crash would.
            os._exit(1)

        def die_before_second_file(*args, **kwargs):  # rank 0, once every process has written its shards
            saves.append(1)
            if len(saves) == 2:
                os._exit(1)
            write_run_files(*args, **kwargs)

        if os.environ.get("DIE_MID_SAVE") == "1":
            h64lm.write_run_files = die_before_second_file
        else:
            h64lm.save_run = save_then_die
    return h64lm.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
