"""`python -m qrb.offline.smoke`: serve the smoke endpoint on 127.0.0.1 until killed (see qrb/offline/smoke)."""

from qrb.offline.smoke.server import main

if __name__ == "__main__":
    main()
