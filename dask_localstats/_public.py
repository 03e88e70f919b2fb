"""The public path of the package's functions.

Public functions are defined in private modules (``_api.py``, ``_io.py``,
``_write.py``) and imported into ``dask_localstats``; :func:`public` marks
each where it is defined, so that ``help()``, reprs and tracebacks name
them as users call them, ``dask_localstats.local_percentile``, as NumPy's
``set_module`` does.
"""


def public(function):
    """Give `function` the package's module name.

    Examples
    --------
    >>> import dask_localstats
    >>> dask_localstats.local_percentile.__module__
    'dask_localstats'
    """
    function.__module__ = "dask_localstats"
    return function
