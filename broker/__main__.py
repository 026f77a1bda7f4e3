from cortex.broker.ctl import main

main()
