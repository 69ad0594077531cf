from .rows import main

main()
