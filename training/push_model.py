"""Upload a model folder to a Hub model repo: ``harmodt-push model`` (see ``--help``).

python training/push_model.py path/to/model namespace/name [--private] [--revision BRANCH] [--message M]
python training/push_model.py runs/tiny/final namespace/name --results results.json   # builds the card first
"""

import sys

from harmodt_hf.hub.cli import push_model_main as main

if __name__ == "__main__":
    sys.exit(main())
