from difcompress.cli import main

main()
