"""Prepare a TFDS dataset once, as array_record files that `tfds.data_source` reads without TF.

    pip install -e ".[prepare]"          # TensorFlow: tfds encodes images with it
    python -m patchdiff.data.prepare cifar10 [--data_dir DIR]

Training itself never needs TensorFlow.
"""

import argparse
import importlib.util
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare a TFDS dataset as array_record files.")
    parser.add_argument("name")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    if importlib.util.find_spec("tensorflow") is None:
        sys.exit(
            f"Preparing {args.name!r} needs TensorFlow (tfds encodes its images with it): run "
            '`pip install -e ".[prepare]"` once, then this command again.'
        )
    import tensorflow_datasets as tfds

    builder = tfds.builder(args.name, data_dir=args.data_dir, file_format="array_record")
    builder.download_and_prepare()
    print(f"prepared {args.name} in {builder.data_dir}")


if __name__ == "__main__":
    main()
