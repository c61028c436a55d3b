"""Convert the official HarmoDT / MTDiff Meta-World data: ``harmodt-convert-official`` (see ``--help``).

python dataset_scripts/convert_official.py --source MT50/dataset --output mt50-official
"""

import sys

from harmodt_hf.data.cli import convert_main as main

if __name__ == "__main__":
    sys.exit(main())
