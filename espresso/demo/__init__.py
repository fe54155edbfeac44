"""The local web app that recognizes things and learns yours (espresso demo)."""
