from agents.rlhf.job import main

main()
