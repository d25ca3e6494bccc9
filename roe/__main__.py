from roe.cli import main

main()
