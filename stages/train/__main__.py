"""`python -m stages.train` (also under `accelerate launch ... -m stages.train`): see stages/train/__init__.py."""

from stages.train.run import main

if __name__ == "__main__":
    main()
