from syncbn.bench.cli import main

main()
