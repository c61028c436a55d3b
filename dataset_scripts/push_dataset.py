"""Upload a dataset folder to a Hub dataset repo: ``harmodt-push dataset`` (see ``--help``).

python dataset_scripts/push_dataset.py path/to/folder namespace/name [--private] [--revision BRANCH]
"""

import sys

from harmodt_hf.hub.cli import push_dataset_main as main

if __name__ == "__main__":
    sys.exit(main())
