"""Write the built-in digits as an EcoTaxa-shaped export, to try ECOTAXA_EXPORT offline.

    python tools/ecotaxa_demo.py [FOLDER]      # FOLDER defaults to data/ecotaxa_digits

Writes FOLDER/images/digit_NNNN.png (scikit-learn's 1,797 handwritten digits, 8x8) and
FOLDER/ecotaxa_export.tsv: categories "0" to "9", statuses validated / predicted / dubious, 18
samples, and four bad rows (a missing image, a repeated object_id, an unknown status, an empty
category) that the reader lists in outputs/ecotaxa_bad_rows.csv. Written once; then train on it:

    python run_all.py --ECOTAXA_EXPORT=data/ecotaxa_digits/ecotaxa_export.tsv --OUTPUT_DIR=outputs/ecotaxa \
        --CHECKPOINT_DIR=checkpoints/ecotaxa
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from plankton import ecotaxa  # noqa: E402


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    tsv = ecotaxa.export_digits_demo(Path(args[0] if args else "data/ecotaxa_digits"))
    print(f"-> {tsv}")


if __name__ == "__main__":
    main()
