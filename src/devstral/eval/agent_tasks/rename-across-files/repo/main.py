from geometry import shapes
from geometry.report import describe, total_area

ROOMS = [(3, 4), (5, 2)]

if __name__ == "__main__":
    for w, h in ROOMS:
        print(describe(w, h))
    print("largest:", max(shapes.calc_area(w, h) for w, h in ROOMS))
    print("total:", total_area(ROOMS))
