from ivl.serve.cli import main

main()
