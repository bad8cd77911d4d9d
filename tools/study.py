"""Run the small-scale study of the paper's claims (resumable) and write docs/results/.

    python tools/study.py --scale cpu      # embedded corpus, 2 CPU cores, about 90 minutes
    python tools/study.py --scale gpu      # DiT-small at a shortened budget
    python tools/study.py --scale toy --runs /tmp/s --docs /tmp/d --data <dataset>   # seconds (CI)

See flm/study.py for the plan and flm/eval/study_report.py for the outputs.
"""

from __future__ import annotations

import fire

from flm.study import run

if __name__ == "__main__":
    fire.Fire(run)
