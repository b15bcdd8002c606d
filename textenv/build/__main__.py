from textenv.build.pipeline import main

main()
