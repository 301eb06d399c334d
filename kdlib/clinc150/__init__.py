"""CLINC150 plus, embedded as data (see README.md here); read by :mod:`kdlib.data`."""
