"""`python -m stages.model_card`: run the model-card stage (see stages/model_card/__init__.py)."""

from stages.model_card.run import main

if __name__ == "__main__":
    main()
