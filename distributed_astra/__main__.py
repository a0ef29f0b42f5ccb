from distributed_astra.cli import main

main()
