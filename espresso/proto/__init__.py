"""Caffe's schema and file formats: the only package that imports protobuf.

`espresso.proto.caffe_pb2` is generated from caffe.proto by tools/gen_proto.sh.
"""
