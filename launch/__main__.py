"""``python -m launch``: the same app as the ``slimtune`` console script."""

from launch.cli import main

if __name__ == "__main__":
    main()
