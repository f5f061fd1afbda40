"""`python -m spendgate`: the `spendgate` command."""

from spendgate.launch import main

main()
