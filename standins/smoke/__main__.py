"""`python -m standins.smoke`: serve the smoke endpoint on 127.0.0.1 until killed (see standins/smoke)."""

from standins.smoke.server import main

if __name__ == "__main__":
    main()
