"""`paysaga bench`: the load generator (`run.py`), what it measures with (`measure.py`), and
the floor workflow it compares paysaga with (`floor.py`, workflow name "FloorWorkflow"). Not
part of the product: nothing in the API, the worker or the intake imports it.
"""
