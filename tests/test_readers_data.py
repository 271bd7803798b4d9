"""Tiny MovieLens-100K-shaped files shared by tests."""
U_DATA = "1\t1\t5\t100\n1\t2\t3\t90\n1\t3\t4\t110\n2\t2\t4\t50\n2\t1\t4\t60\n2\t3\t4\t70\n"
U_ITEM = ("1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
          "2|Caf\xe9 Society (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n"
          "3|Heat (1995)|01-Jan-1995||http://x|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0\n")
