from livemig.cli import main

main()
