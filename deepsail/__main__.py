"""`python -m deepsail`: the same CLI as the `deepsail` script. What torchrun runs (`torchrun ... -m deepsail pretrain
...`): torchrun starts the processes, each one runs this."""

from deepsail.cli import app

if __name__ == "__main__":
    app()
