"""``skmerge convert``: reflection files → an observation store (:mod:`skmerge.store`)."""

import time

_DESCRIPTION = """\
Read unmerged reflection files (in parallel with --n-jobs) and write their observation table as an
observation store: a directory of Parquet files that skmerge reads back at once (skmerge mono STORE ...,
skmerge.read_unmerged(STORE)). The read flags are applied while converting."""

_EPILOG = """\
examples:
  skmerge convert --spacegroups 'P 43 21 2' --n-jobs 2 run*.stream lysozyme.parquet
  skmerge mono "dHKL,XDET,YDET" lysozyme.parquet out/lysozyme"""


def register(commands):
    """Add the ``convert`` subcommand to the command line's subparsers."""
    from .cli import _Formatter, add_read_arguments
    from .merger import VariationalMerger
    from .store import ROW_GROUP_SIZE

    convert = commands.add_parser("convert", help="write reflection files as an observation store (Parquet)",
                                  description=_DESCRIPTION, epilog=_EPILOG, formatter_class=_Formatter)
    convert.add_argument("reflection_files", nargs="+", metavar="REFLECTION_FILE",
                         help="unmerged MTZ, XDS_ASCII.HKL / INTEGRATE.HKL, CrystFEL .stream or DIALS .refl")
    convert.add_argument("store", metavar="STORE", help="the store's directory, e.g. run.parquet (replaced if it "
                         "is a store already)")
    add_read_arguments(convert.add_argument_group("data"), VariationalMerger().get_params())
    convert.add_argument("-j", "--n-jobs", type=int, metavar="N", help="parse N files at once in worker processes "
                         "(-1: one per core; default: one file at a time)")
    convert.add_argument("--row-group-size", type=int, default=ROW_GROUP_SIZE, metavar="N",
                         help="observations per Parquet row group, in whole images (default: %(default)s)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    convert.set_defaults(run=_convert)


def _convert(args):
    from .cli import read_options
    from .store import read_manifest, write_store

    start = time.perf_counter()
    store = write_store(args.reflection_files, args.store, anomalous=args.anomalous, n_jobs=args.n_jobs,
                        progress=not args.quiet, row_group_size=args.row_group_size, **read_options(args))
    if not args.quiet:
        manifest = read_manifest(store)
        print(f"wrote {store}: {manifest['observations']:,} observations on {manifest['images']:,} images of "
              f"{manifest['reflections']:,} reflections from {len(manifest['files'])} file(s) in "
              f"{time.perf_counter() - start:.1f} s")
    return 0
