"""Generate Meta-World offline datasets with the scripted experts: ``harmodt-generate-data`` (see ``--help``).

python dataset_scripts/generate_metaworld.py --tasks mt50 --episodes-per-task 2000 --num-workers 16 --output mt50
"""

import sys

from harmodt_hf.data.cli import generate_main as main

if __name__ == "__main__":
    sys.exit(main())
